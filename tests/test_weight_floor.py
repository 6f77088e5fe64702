"""``python -m adaserve.runtime.weight_floor`` on the CPU with the tiny shape: the table and the
JSON it writes, graphs on (the padded steps, run eagerly on the CPU) and off, and its argument errors."""

import json

import pytest
import torch

from adaserve.runtime import weight_floor
from adaserve.runtime.random_checkpoint import SHAPES


def test_weight_bytes_count_every_matrix_once():
    tied = weight_floor.random_model(SHAPES["llama-tiny"], torch.float32, "cpu")
    c = tied.config
    assert c.tie_word_embeddings
    assert weight_floor.weight_bytes_per_decode_step(tied) == 4 * sum(p.numel() for p in tied.parameters())
    untied = weight_floor.random_model(c.with_(tie_word_embeddings=False), torch.float32, "cpu")
    emb = c.vocab_size * c.hidden_size
    assert weight_floor.weight_bytes_per_decode_step(untied) == 4 * (sum(p.numel() for p in untied.parameters()) - emb)


def test_cli_measures_every_step_against_the_floor(tmp_path, capsys):
    out = tmp_path / "floor.json"
    assert weight_floor.main(["--shapes", "llama-tiny", "--device", "cpu", "--json", str(out)]) == 0
    [r] = json.loads(out.read_text())
    assert r["shape"] == "llama-tiny" and r["floor_ms"] > 0 and r["copy_tb_s"] > 0
    assert set(r["steps"]) == {"graphs on", "graphs off", "graphs on, cuDNN attention allowed"}
    for steps in r["steps"].values():
        assert all(steps[label] > 0 for label, *_ in weight_floor.STEPS)
    assert r["steps"]["graphs on"]["graphed steps"] > 0  # the padded path ran
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # the default is back after the cuDNN rows
    assert len(r["prefill"]) == 5 and all(ms > 0 for ms in r["prefill"].values())
    assert sum(label.endswith("graphed") for label in r["prefill"]) == 2  # as the engine with graphs runs them
    assert r["kernels"][0]["name"] == "(all)" and len(r["kernels"]) > 3
    assert r["kernels"][0]["ms_per_step"] >= max(k["ms_per_step"] for k in r["kernels"][1:])
    assert any("mm" in k["name"] or "linear" in k["name"] for k in r["kernels"][1:])  # the GEMMs are there
    assert set(r["sdpa"]) == {"decode (1 x 128 keys)", "tree (8 x 1024 keys)", "prefill (512 x 512 keys)",
                              "decode, cuDNN attention allowed", "decode, GQA unfolded"}
    assert all(v in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION") for v in r["sdpa"].values())
    text = capsys.readouterr().out
    assert text.count("| llama-tiny |") == 1 + 3 * len(weight_floor.STEPS) + 5
    assert "kernels by time" in text and "SDPA picks" in text


@pytest.mark.parametrize("args,msg", [(["--shapes", "gpt-9"], "unknown"), (["--graphs", "maybe"], "--graphs")])
def test_cli_errors_name_the_bad_value(args, msg, capsys):
    with pytest.raises(SystemExit):
        weight_floor.main([*args, "--device", "cpu"])
    assert msg in capsys.readouterr().err


def test_cudnn_attention_is_kept_out_unless_asked_for(monkeypatch):
    from adaserve.core.errors import UserError
    from adaserve.engine import model as model_mod

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.delenv(model_mod.CUDNN_SDPA_ENV, raising=False)
        model_mod.configure_attention_backends()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setenv(model_mod.CUDNN_SDPA_ENV, "1")
        model_mod.configure_attention_backends()
        assert torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setenv(model_mod.CUDNN_SDPA_ENV, "yes")
        with pytest.raises(UserError, match="ADASERVE_CUDNN_SDPA='yes'"):
            model_mod.configure_attention_backends()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_gqa_fold_is_on_for_cuda_only_unless_asked(monkeypatch):
    from adaserve.core.errors import UserError
    from adaserve.engine import model as model_mod

    monkeypatch.delenv(model_mod.GQA_FOLD_ENV, raising=False)
    assert model_mod.fold_gqa(torch.device("cuda")) and not model_mod.fold_gqa(torch.device("cpu"))
    monkeypatch.setenv(model_mod.GQA_FOLD_ENV, "1")
    assert model_mod.fold_gqa(torch.device("cpu"))
    with weight_floor.gqa_folded(False):
        assert not model_mod.fold_gqa(torch.device("cuda"))
    assert model_mod.fold_gqa(torch.device("cpu"))  # restored
    monkeypatch.setenv(model_mod.GQA_FOLD_ENV, "yes")
    with pytest.raises(UserError, match="ADASERVE_GQA_FOLD='yes'"):
        model_mod.fold_gqa(torch.device("cpu"))


def test_folded_bias_repeats_each_query_row_per_head():
    from adaserve.engine.model import folded_attention_bias

    mask = torch.rand(2, 1, 3, 16) > 0.5
    bias = folded_attention_bias(mask, 4, torch.float32)
    assert bias.shape == (2, 1, 12, 16)
    for j in range(4):  # row j * Q + i is query row i for the j-th head of the group
        assert torch.equal(bias[:, :, 3 * j: 3 * j + 3] == 0, mask)
    assert torch.isinf(bias[~mask.repeat(1, 1, 4, 1)]).all()
