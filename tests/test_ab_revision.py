"""benchmarks/ab_revision.py on the CPU: the revision's kernel sources, the argument checks, and
the refusal without a GPU (the A/B itself needs an sm_90 device)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ab_revision as ab  # noqa: E402

sys.path.pop(0)


def _git(*args):
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, check=True).stdout


def test_sources_at_writes_the_revisions_files(tmp_path):
    from megatron_dsa.kernels.sparse_mla import cuda_impl as ci

    rev = "HEAD"  # (a shallow clone has no other)
    got = ab.sources_at(rev, list(ci.SOURCES) + list(ci.HEADERS), tmp_path)
    assert [p.name for p in got] == [p.name for p in list(ci.SOURCES) + list(ci.HEADERS)]
    for src, p in zip(list(ci.SOURCES) + list(ci.HEADERS), got):
        rel = os.path.relpath(src, ROOT)
        assert p.read_bytes() == _git("show", f"{rev}:{rel}")


def test_sources_at_names_a_bad_revision_and_a_missing_file(tmp_path):
    from megatron_dsa.kernels.sparse_mla import cuda_impl as ci

    with pytest.raises(ValueError, match="--rev 'no-such-rev' is not a commit"):
        ab.sources_at("no-such-rev", ci.SOURCES, tmp_path)
    with pytest.raises(ValueError, match="no_such_file.cu does not exist at --rev 'HEAD'"):
        ab.sources_at("HEAD", [ci.HEADERS[0].parent / "no_such_file.cu"], tmp_path)


@pytest.mark.parametrize("text,match", [("16384", "S:H pairs"), ("a:b", "S:H pairs"), ("0:64", "positive")])
def test_parse_cases_names_the_argument(text, match):
    with pytest.raises(ValueError, match=match):
        ab.parse_cases(text)
    assert ab.parse_cases("4096:16,16384:128") == [(4096, 16), (16384, 128)]


def test_bad_ops_and_no_gpu(capsys):
    with pytest.raises(SystemExit):
        ab.main(["--ops", "fwd,dq"])
    assert "--ops takes fwd and / or bwd" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert ab.main(["--ops", "fwd"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
