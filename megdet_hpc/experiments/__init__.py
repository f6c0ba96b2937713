"""Experiments: reruns of the paper's claims at toy scale (``megdet_table``)."""
