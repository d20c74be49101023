"""benchmarks/ab_revision.py on the CPU: the revision's kernel sources, the argument checks, and
the refusal without a GPU (the A/B itself needs an sm_90 device)."""

import os
import re
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
    # a header added since the revision: left out with missing_ok, the others still written
    got = ab.sources_at("HEAD", [ci.HEADERS[0].parent / "no_such_file.cuh", ci.HEADERS[0]], tmp_path, missing_ok=True)
    assert [p.name for p in got] == [ci.HEADERS[0].name]


def test_export_and_rev_dir_round_trip(tmp_path):
    """``--export`` writes the revision's sources and REVISION (a machine with an older git
    history builds from that folder); ``sources_in`` reads them back and names what is missing."""
    from megatron_dsa.kernels.sparse_mla import cuda_impl as ci

    assert ab.main(["--rev", "HEAD", "--export", str(tmp_path / "rev")]) == 0
    srcs, hdrs, line = ab.sources_in(tmp_path / "rev", ci.SOURCES, ci.HEADERS)
    head = _git("rev-parse", "HEAD").decode().strip()
    assert line.split()[0] == head
    assert [p.name for p in srcs] == [p.name for p in ci.SOURCES] and [p.name for p in hdrs] == [p.name for p in ci.HEADERS]
    for src, p in zip(ci.SOURCES, srcs):
        assert p.read_bytes() == _git("show", f"HEAD:{os.path.relpath(src, ROOT)}")
    # the indexer's select too, and every quoted include of an exported source resolves beside it
    # (the files keep their paths in the repository: select_sm90.cu includes ../../sparse_mla/...)
    ix_srcs, ix_hdrs, _ = ab.sources_in(tmp_path / "rev", *ab.kernel_sets()["indexer"])
    assert [p.name for p in ix_srcs] == ["select_sm90.cu"]
    assert "sm90_common.cuh" in [p.name for p in ix_hdrs]
    for src in list(srcs) + list(ix_srcs) + list(hdrs) + list(ix_hdrs):
        for inc in re.findall(r'^#include "([^"]+)"', src.read_text(), re.M):
            assert (src.parent / inc).is_file(), (src, inc)
    ab._in(tmp_path / "rev", ci.SOURCES[0]).unlink()
    with pytest.raises(ValueError, match=f"--rev-dir .* lacks {ci.SOURCES[0].name}"):
        ab.sources_in(tmp_path / "rev", ci.SOURCES, ci.HEADERS)
    with pytest.raises(ValueError, match="has no REVISION file"):
        ab.sources_in(tmp_path, ci.SOURCES, ci.HEADERS)
    with pytest.raises(SystemExit):
        ab.main(["--rev-dir", str(tmp_path), "--export", str(tmp_path / "x")])


@pytest.mark.parametrize("text,match", [("16384", "S:H pairs"), ("a:b", "S:H pairs"), ("0:64", "positive")])
def test_parse_cases_names_the_argument(text, match):
    with pytest.raises(ValueError, match=match):
        ab.parse_cases(text)
    assert ab.parse_cases("4096:16,16384:128") == [(4096, 16), (16384, 128)]


def test_bad_ops_and_no_gpu(capsys):
    with pytest.raises(SystemExit):
        ab.main(["--ops", "fwd,dq"])
    assert "--ops takes fwd, bwd, topk and / or select" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert ab.main(["--ops", "fwd"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def _commit_or_skip(rev):
    if subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{rev}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"{rev} is not in this clone's history")


def test_an_indexer_revision_before_the_256_thread_select(tmp_path):
    """A revision older than the (since removed) 256-thread select (187b061) exports and reads
    back, and its one entry point is the tree's; its source stays required."""
    _commit_or_skip("187b061")
    srcs, hdrs = ab.kernel_sets()["indexer"]
    assert ab.main(["--rev", "187b061", "--export", str(tmp_path / "rev")]) == 0
    got, _, line = ab.sources_in(tmp_path / "rev", srcs, hdrs)
    assert line.startswith("187b061") and [p.name for p in got] == ["select_sm90.cu"]
    theirs, ours = ab.entry_points(got), ab.entry_points(srcs)
    assert list(ours) == list(theirs) == ["dsa_indexer_select"] and ab.entry_point_mismatch(ours, theirs) == []
    got[0].unlink()
    with pytest.raises(ValueError, match="lacks select_sm90.cu"):
        ab.sources_in(tmp_path / "rev", srcs, hdrs)


def test_an_indexer_revision_with_the_256_thread_select(tmp_path):
    """A revision that still had the 256-thread select (badbe1e: a second source file with a
    second entry point) exports the tree's sources (its ``select_sm90.cu`` alone defines the
    tree's entry point) and reads back; with its second file, the extra entry point is
    ignored."""
    _commit_or_skip("badbe1e")
    srcs, hdrs = ab.kernel_sets()["indexer"]
    assert ab.main(["--rev", "badbe1e", "--export", str(tmp_path / "rev")]) == 0
    got, got_hdrs, line = ab.sources_in(tmp_path / "rev", srcs, hdrs)
    assert line.startswith("badbe1e") and [p.name for p in got] == ["select_sm90.cu"]
    assert [p.name for p in got_hdrs] == [p.name for p in hdrs]
    ours = ab.entry_points(srcs)
    assert ab.entry_points(got) == ours
    folder = os.path.relpath(srcs[0].parent, ROOT)
    names = _git("ls-tree", "--name-only", "badbe1e", folder + "/").decode().split()
    cu = [srcs[0].parent / os.path.basename(n) for n in names if n.endswith(".cu")]
    assert len(cu) == 2 and srcs[0] in cu
    both = ab.sources_at("badbe1e", cu, tmp_path / "both")
    theirs = ab.entry_points(both)
    assert len(theirs) == 2 and theirs["dsa_indexer_select"] == ours["dsa_indexer_select"]
    assert ab.entry_point_mismatch(ours, theirs) == []


def test_entry_point_rule_on_the_select(tmp_path):
    """The tree's select entry point with an extra entry point beside it: accepted; with one
    parameter changed, or missing: refused."""
    srcs = ab.kernel_sets()["indexer"][0]
    ours = ab.entry_points(srcs)
    text = srcs[0].read_text()
    extra = tmp_path / "extra.cu"
    extra.write_text(text + '\nextern "C" {\nint dsa_indexer_select_other(int x) { return x; }\n}\n')
    theirs = ab.entry_points([extra])
    assert set(theirs) == {"dsa_indexer_select", "dsa_indexer_select_other"}
    assert ab.entry_point_mismatch(ours, theirs) == []
    changed = tmp_path / "changed.cu"
    changed.write_text(text.replace("int S, int K, void* idx", "int S, long long K, void* idx"))
    assert ab.entry_point_mismatch(ours, ab.entry_points([changed])) == ["dsa_indexer_select"]
    assert ab.entry_point_mismatch(ours, {"dsa_indexer_select_other": "int x"}) == ["dsa_indexer_select"]


def _select_rev_dir(folder, edit):
    """A ``--rev-dir`` folder holding the tree's indexer sources, ``select_sm90.cu`` passed
    through ``edit``."""
    srcs, hdrs = ab.kernel_sets()["indexer"]
    for p in list(srcs) + list(hdrs):
        target = ab._in(folder, p)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = p.read_text()
        target.write_text(edit(text) if p == srcs[0] else text)
    (folder / "REVISION").write_text("0123456789abcdef0123456789abcdef01234567 a test revision\n")


@pytest.mark.parametrize("kind", ["extra_entry", "changed_parameters"])
def test_main_accepts_an_extra_entry_point_and_refuses_changed_parameters(tmp_path, monkeypatch, capsys, kind):
    """``main`` on a ``--rev-dir`` whose select has an extra entry point goes on to build it (the
    build stubbed out here); one whose ``dsa_indexer_select`` takes another parameter list is
    refused before any build, naming it."""
    from megatron_dsa.kernels import cuda_build

    class Built(Exception):
        pass

    built = []

    def fake_build(name, sources, headers=(), arch="sm_90a", **kw):
        built.append((name, [p.name for p in sources]))
        raise Built

    if kind == "extra_entry":
        edit = lambda t: t + '\nextern "C" {\nint dsa_indexer_select_other(int x) { return x; }\n}\n'  # noqa: E731
    else:
        edit = lambda t: t.replace("int S, int K, void* idx", "int S, long long K, void* idx")  # noqa: E731
    assert edit(ab.kernel_sets()["indexer"][0][0].read_text()) != ab.kernel_sets()["indexer"][0][0].read_text()
    _select_rev_dir(tmp_path / "rev", edit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_build, "build_library", fake_build)
    argv = ["--rev-dir", str(tmp_path / "rev"), "--ops", "select", "--cases", "1024:4"]
    if kind == "extra_entry":
        with pytest.raises(Built):
            ab.main(argv)
        assert built == [("indexer_rev_0123456789", ["select_sm90.cu"])]
    else:
        with pytest.raises(SystemExit):
            ab.main(argv)
        assert built == []
        err = capsys.readouterr().err
        assert "dsa_indexer_select are missing from it or take other parameters" in err


def test_entry_points_see_a_changed_parameter_list(tmp_path):
    from megatron_dsa.kernels.sparse_mla import cuda_impl as ci

    tree = ab.entry_points(ci.SOURCES)
    assert "dsa_sparse_mla_fwd_pp_sm90" in tree and "dsa_pack_rows" in tree
    src = next(p for p in ci.SOURCES if p.name == "pack_rows.cu")
    changed = tmp_path / "changed" / src.name
    changed.parent.mkdir()
    changed.write_text(src.read_text().replace("int dsa_pack_rows(const void* idx, long long idx_st,",
                                               "int dsa_pack_rows(const void* idx, int idx_st,"))
    got = ab.entry_points([changed])
    assert got["dsa_pack_rows"] != tree["dsa_pack_rows"]
    assert {k: v for k, v in got.items() if k != "dsa_pack_rows"} == {
        k: v for k, v in tree.items() if k in got and k != "dsa_pack_rows"}


def test_rel_and_summary():
    x = torch.randn(5000, 3)
    assert ab._rel(x, x.clone()) == 0.0
    y = x.clone()
    y[7, 1] += 1.0
    assert ab._rel(y, x) == pytest.approx(1.0 / float(x.double().norm()), rel=1e-6)
    z = x.clone()
    z[0, 0] = float("nan")
    assert ab._rel(z, x) == ab._rel(x.clone(), x) == 0.0  # non-finite entries are left out
    rows = [dict(op="bwd", S=16384, H=64, rev_ms=28.4, tree_ms=28.2, speedup=1.0071, revision="abc1234",
                 dq_bit_identical=True, dq_rel=0.0, dkv_rel=4.0e-5),
            dict(op="select", S=32768, H=64, rev_ms=0.7, tree_ms=0.57, speedup=1.228, revision="abc1234",
                 idx_same_sets=True),
            dict(op="topk", S=32768, H=64, rev_ms=16.3, tree_ms=16.0, speedup=1.019, revision="abc1234",
                 idx_same_sets=False)]
    text = ab.summary(rows)
    assert "28.400" in text and "28.200" in text and "dq same bits" in text and "dkv 4.0e-05" in text
    assert "select  32768" in text and "same sets" in text and "DIFFERENT SETS" in text


def test_same_sets_ignores_the_slot_order():
    idx = torch.tensor([[[3, 1, 2, -1]]], dtype=torch.int32)
    vals = torch.tensor([[[0.5, 2.0, 1.0, float("-inf")]]])
    perm = [2, 0, 3, 1]
    assert ab._same_sets((idx, vals), (idx[..., perm], vals[..., perm])) == {"idx_same_sets": True}
    other = idx.clone()
    other[0, 0, 0] = 4
    assert ab._same_sets((idx, vals), (other, vals)) == {"idx_same_sets": False}
    assert ab._same_sets((idx, vals), (idx, vals + 1)) == {"idx_same_sets": False}
