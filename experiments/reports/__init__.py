"""The read side (SPEC §10): figures per checkpoint from rollups maintained as records
land (``rollups``, ``histogram``), what a report is asked for (``filters``), the figures
(``figures``), the sample-ratio check and comparisons (``statistics``), the whole report
(``report``), its charts (``charts``), the request browser (``browser``) and the
feedback join (``feedback``)."""
