"""The seed example, run as the README says, prints a finished output with text."""

import os
import re
import subprocess
import sys

from conftest import CACHE_DIR, REPO


def test_seed_example_runs_unchanged():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "examples" / "async_llm_engine.py"), "--model", "smollm2-135m-instruct",
           "--devices", "cpu", "--cache-dir", CACHE_DIR]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RequestOutput(request_id='request-123'" in out.stdout
    assert "finished=True" in out.stdout
    text = re.search(r"text='(.*?)', token_ids", out.stdout, re.S)
    assert text and text.group(1).strip()
