"""Test helper: make decord kill the process (or hang) on chosen files, as it can on some corrupt H.264 streams."""

import faulthandler
import os
import time

import decord

CRASH_FILES = "SKILLPIPE_TEST_CRASH_FILES"  # os.pathsep-separated paths
HANG_FILES = "SKILLPIPE_TEST_HANG_FILES"
_real_reader = decord.VideoReader


def reader(path, *args, **kwargs):
    if str(path) in os.environ.get(CRASH_FILES, "").split(os.pathsep):
        faulthandler.disable()  # pytest's would print every thread's stack
        os.abort()
    if str(path) in os.environ.get(HANG_FILES, "").split(os.pathsep):
        time.sleep(120)  # longer than any test timeout: a decode that never returns in time
    return _real_reader(path, *args, **kwargs)


def install() -> None:
    decord.VideoReader = reader
