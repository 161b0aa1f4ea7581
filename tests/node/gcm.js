// An independent AES-256-GCM implementation (Node's crypto) for the interop test.
//
//   BYOK_ENCRYPTION_KEY=<base64 of 32 bytes> node gcm.js encrypt  < plaintext  > envelope.json
//   BYOK_ENCRYPTION_KEY=<base64 of 32 bytes> node gcm.js decrypt  < envelope.json > plaintext
//
// The envelope is {"iv", "data", "authTag"}, each base64, with a 12-byte iv and
// a 16-byte tag. The key comes from the environment, never from argv, so it does
// not show up in process listings.
"use strict";

const crypto = require("crypto");

function readStdin() {
  return require("fs").readFileSync(0, "utf8");
}

function key() {
  const raw = Buffer.from(process.env.BYOK_ENCRYPTION_KEY || "", "base64");
  if (raw.length !== 32) {
    process.stderr.write("BYOK_ENCRYPTION_KEY must be base64 of 32 bytes\n");
    process.exit(2);
  }
  return raw;
}

function encrypt(plaintext) {
  const iv = crypto.randomBytes(12);
  const cipher = crypto.createCipheriv("aes-256-gcm", key(), iv);
  const data = Buffer.concat([cipher.update(plaintext, "utf8"), cipher.final()]);
  return {
    iv: iv.toString("base64"),
    data: data.toString("base64"),
    authTag: cipher.getAuthTag().toString("base64"),
  };
}

function decrypt(envelope) {
  const decipher = crypto.createDecipheriv(
    "aes-256-gcm",
    key(),
    Buffer.from(envelope.iv, "base64"),
  );
  decipher.setAuthTag(Buffer.from(envelope.authTag, "base64"));
  return Buffer.concat([
    decipher.update(Buffer.from(envelope.data, "base64")),
    decipher.final(),
  ]).toString("utf8");
}

const mode = process.argv[2];
if (mode === "encrypt") {
  process.stdout.write(JSON.stringify(encrypt(readStdin())));
} else if (mode === "decrypt") {
  process.stdout.write(decrypt(JSON.parse(readStdin())));
} else {
  process.stderr.write("usage: node gcm.js encrypt|decrypt\n");
  process.exit(2);
}
