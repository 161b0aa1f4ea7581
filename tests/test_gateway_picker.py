"""The SPEC §7 picker, as a pure function."""

from __future__ import annotations

import hashlib
import uuid

from gateway.routing import allocation_seed, bucket_of, pick_variant
from gateway.subjects import Subject

EXPERIMENT = "0b6f6a7e-2f5c-4a8e-9a43-1d2c3b4a5f60"


def _variants(*weights):
    ids = sorted(str(uuid.uuid4()) for _ in weights)
    return [{"id": vid, "weight": w} for vid, w in zip(ids, weights, strict=True)]


def _spec_pick(variants, kind, value):
    seed = f"model_exp_{EXPERIMENT}_{kind}_{value}".encode()
    bucket = int.from_bytes(hashlib.sha256(seed).digest()[:4], "big") % sum(
        v["weight"] for v in variants
    )
    running = 0
    for v in sorted(variants, key=lambda v: uuid.UUID(v["id"])):
        running += v["weight"]
        if running > bucket:
            return v["id"]


def test_seed_has_the_spec_shape():
    assert allocation_seed(EXPERIMENT.upper(), "user", "42") == f"model_exp_{EXPERIMENT}_user_42"


def test_bucket_is_first_four_bytes_big_endian_modulo_total():
    digest = hashlib.sha256(b"some-seed").digest()
    assert bucket_of("some-seed", 7) == int.from_bytes(digest[:4], "big") % 7


def test_pick_matches_an_independent_spec_computation():
    variants = _variants(1, 2, 3)
    for kind, values in (
        ("user", [str(n) for n in range(50)]),
        ("machine", [f"m-{n}" for n in range(50)]),
        ("ip", [f"198.51.100.{n}" for n in range(50)]),
    ):
        for value in values:
            chosen = pick_variant(variants, EXPERIMENT, Subject(kind, value))
            assert chosen["id"] == _spec_pick(variants, kind, value)


def test_pick_walks_variants_by_id_whatever_their_given_order():
    variants = _variants(1, 3)
    subjects = [Subject("machine", f"m{n}") for n in range(200)]
    forward = [pick_variant(variants, EXPERIMENT, s)["id"] for s in subjects]
    backward = [pick_variant(variants[::-1], EXPERIMENT, s)["id"] for s in subjects]
    assert forward == backward


def test_labels_play_no_part_in_picking():
    variants = _variants(1, 1)
    relabelled = [{**v, "label": f"new-{i}"} for i, v in enumerate(variants)]
    for n in range(100):
        subject = Subject("user", str(n))
        assert (
            pick_variant(variants, EXPERIMENT, subject)["id"]
            == pick_variant(relabelled, EXPERIMENT, subject)["id"]
        )


def test_weights_1_to_3_split_within_3_points_over_4000_subjects():
    variants = _variants(1, 3)
    light_weight_id = [v["id"] for v in variants if v["weight"] == 1][0]
    hits = sum(
        pick_variant(variants, EXPERIMENT, Subject("user", str(n)))["id"] == light_weight_id
        for n in range(4000)
    )
    assert abs(hits / 4000 - 0.25) <= 0.03
