"""The reader of PyTorch AutoHeuristic's mm timings (tuning/inductor_data.py), on small files written here."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from torchtune_ops.kernels import gemm_space
from torchtune_ops.search import Space, tune
from torchtune_ops.tuning import inductor_data

HEADER = ("m,k,n,mat1_dtype,mat2_dtype,mat1_stride_0,mat1_stride_1,mat2_stride_0,mat2_stride_1,mat1_iscontig,"
          "mat2_iscontig,using_tf32,choice,feedback")
META = {"shared_memory": 232448, "device_capa": [9, 0], "name": "mm"}


def _choice(bm, bk, bn, stages, warps):
    return f"type=triton_BLOCK-M={bm}_BLOCK-K={bk}_BLOCK-N={bn}_numstages={stages}_numwarps={warps}"


CHOICES = [_choice(16, 16, 32, 3, 2), _choice(64, 32, 64, 2, 4), _choice(128, 64, 128, 3, 8)]


def _write(path, rows, *, gz):
    text = json.dumps(META) + "\n" + HEADER + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _rows():
    """Three shapes (odd sizes; a transposed B; float32 with TF32): each choice timed, some twice."""
    shape_a = (257, 61, 1031, "torch.float16", "torch.float16", 61, 1, 1, 61, True, False, "not_float_32")
    shape_b = (1, 4096, 17, "torch.bfloat16", "torch.bfloat16", 4096, 1, 17, 1, True, True, "not_float_32")
    shape_c = (97, 13, 5, "torch.float32", "torch.float32", 1, 97, 5, 1, False, True, "True")
    rows = []
    for i, s in enumerate((shape_a, shape_b, shape_c)):
        rows.append((*s, "extern_mm", 0.5 + i))
        for j, ch in enumerate(CHOICES):
            rows.append((*s, ch, 1.0 + j + i))
    rows.append((*shape_a, CHOICES[0], 3.0))   # repeated timings: the median of 1.0, 3.0, 2.0 is 2.0
    rows.append((*shape_a, CHOICES[0], 2.0))
    rows.append((*shape_b, "extern_mm", 2.5))  # median of 1.5 and 2.5
    return rows


@pytest.mark.parametrize("gz", [True, False])
def test_read_maps_problems_configs_and_medians(tmp_path, gz):
    data = inductor_data.read(_write(tmp_path / ("x_mm.txt.gz" if gz else "x_mm.txt"), _rows(), gz=gz))
    assert data.name == "x_mm" and data.gpu == "H100" and data.limits()[1:] == (132, 232448, (9, 0))
    assert len(data.problems) == 3 and len(data.configs) == 3
    a, b, c = data.problems
    assert (a["M"], a["N"], a["K"], a["dtype"], a["a_layout"], a["b_layout"]) == (257, 1031, 61, "float16", "row",
                                                                                 "col")
    assert (b["M"], b["N"], b["K"], b["dtype"], b["b_layout"], b["precision"]) == (1, 17, 4096, "bfloat16", "row",
                                                                                   "ieee")
    assert (c["dtype"], c["a_layout"], c["precision"]) == ("float32", "col", "tf32")
    for p in data.problems:  # every problem is one our GEMM family accepts
        gemm_space.GemmProblem(**p)
    assert data.configs[2] == {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                               "num_stages": 3, "SPLIT_K": 1, "TMA": 0}
    assert inductor_data.choice_name(data.configs[2]) == CHOICES[2]
    assert set(data.configs[0]) == set(gemm_space.space(gemm_space.GemmProblem(**a)))
    assert data.times[0, 0] == 2.0 and data.times[1, 2] == 4.0
    assert data.aten.tolist() == [0.5, 2.0, 2.5]
    np.testing.assert_allclose(data.optimum, [0.5, 2.0, 2.5])
    rows = data.rows()
    assert len(rows) == 9 and rows[0] == (a, data.configs[0], 2.0, 0.5)


def test_replay_space_with_tune_and_a_fake_timer(tmp_path):
    data = inductor_data.read(_write(tmp_path / "y.txt", _rows(), gz=False))
    cands, times = data.replay(2)
    assert len(cands) == 3 and sorted(times.values()) == [3.0, 4.0, 5.0]
    space = Space({k: sorted({c[k] for c in cands}) for k in cands[0]})
    measured = []

    def timer(cfg):
        measured.append(cfg)
        return times[json.dumps(cfg, sort_keys=True)]

    result = tune(space, timer, candidates=cands, max_trials=10, seed=0)
    assert len(measured) == 3 and result.best_value == 3.0 and result.best_config == data.configs[0]


def test_bad_files_raise(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("m,k,n\n1,2,3\n")
    with pytest.raises(ValueError, match="metadata"):
        inductor_data.read(p)
    p.write_text(json.dumps(META) + "\nm,k,n\n1,2,3\n")
    with pytest.raises(ValueError, match="missing columns"):
        inductor_data.read(p)
    rows = [r[:-2] + ("type=cutlass_foo", 1.0) for r in _rows()[:2]]
    with pytest.raises(ValueError, match="unknown Inductor mm choice"):
        inductor_data.read(_write(tmp_path / "z.txt", rows, gz=False))
    assert inductor_data.parse_choice("extern_mm") is None
