"""`hachat serve` sets the garbage collector up for many long-lived parked requests."""

from __future__ import annotations

import gc

from hachat.cli import GC_YOUNG_THRESHOLD, tune_garbage_collector


def test_tune_garbage_collector_freezes_start_up_and_collects_less_often():
    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_freeze_count() > 1000  # what the imports made is out of every pass
        young, older, oldest = gc.get_threshold()
        assert young == GC_YOUNG_THRESHOLD > before[0]
        assert (older, oldest) == before[1:]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
