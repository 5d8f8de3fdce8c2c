"""What the quantize CLI tests share: checks that are collected, not raised (one run reports every
failure), moemesh run through hf_reference.run_cli, and a work folder that --keep keeps."""
import contextlib
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import hf_reference as hf  # noqa: E402

MOEMESH = sys.argv[1]
FAILS = []


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what)
    return cond


def run(args):
    """(exit status, stdout, stderr) of `moemesh ARGS`."""
    return hf.run_cli(MOEMESH, args)


@contextlib.contextmanager
def work_folder(prefix):
    """A temporary folder, removed afterwards unless the command line says --keep."""
    work = tempfile.mkdtemp(prefix=prefix)
    try:
        yield work
    finally:
        if "--keep" in sys.argv[2:]:
            print("kept " + work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def summary(name):
    """Prints the verdict; the exit status for it."""
    print("%s: %s" % (name, "all passed" if not FAILS else "%d FAILED" % len(FAILS)))
    return 1 if FAILS else 0
