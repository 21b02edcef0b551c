"""factorize on real architectures (torch.nn, transformers, timm; tiny configs, random init): with
every selected weight made low rank (block by block, as ProxRank thresholds it), the factorized
model is smaller, its eval outputs equal the dense low-rank model's, it trains, compiles, and
round-trips through torch.save and load_factorized."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import proxrank
from proxrank import factorize, load_factorized
from proxrank.factorize import Factorized, FactorizeSummary
from proxrank.selection import select_targets

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is an optional dependency
    Conv1D = None

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
RANK = 2


def make_low_rank(model: nn.Module, rank: int = RANK) -> nn.Module:
    """Project every matrix of the default selection (blocks of stacked weights separately, read
    through their views as ProxRank reads them) onto its best rank-``rank`` approximation."""
    with torch.no_grad():
        for t in select_targets(model):
            M = t.view.read(t.param).double()
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            t.view.write(t.param, (U[:, :rank] * S[:rank]) @ Vh[:rank])
    return model


@dataclass
class Case:
    """An architecture: ``build()`` a fresh model; ``inputs(model)`` args and kwargs of a call;
    ``kinds``: module kinds with a factorized row in the summary; ``dense_kinds``: kinds
    reported but left dense; ``padded``: positions of the output that are padding (their value
    is unspecified: the dense encoder's nested-tensor path gives zeros there)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    kinds: set[str]
    dense_kinds: set[str] = field(default_factory=set)
    padded: torch.Tensor | None = None


def _output(out) -> torch.Tensor:
    """The main tensor of a model's output (logits, hidden states, or the first of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return _output(out[0])
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(f"no tensor in {type(out).__name__}")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- torch.nn ----------------------------------------------------------------------------------


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


PAD = torch.zeros(2, 7, dtype=torch.bool)
PAD[1, 5:] = True  # right padding: the dense encoder's nested-tensor path


def _encoder_inputs():
    return (torch.randn(2, 7, 32, generator=_gen()),), {"src_key_padding_mask": PAD}


def _decoder() -> nn.Module:
    return nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1), 2)


def _decoder_inputs():
    tgt, memory = torch.randn(5, 2, 32, generator=_gen()), torch.randn(7, 2, 32, generator=_gen(1))
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    return (tgt, memory), {"tgt_mask": mask, "tgt_is_causal": True}


def _transformer() -> nn.Module:
    return nn.Transformer(32, 4, 1, 1, 64, dropout=0.1, batch_first=True)


def _transformer_inputs():
    src, tgt = torch.randn(2, 7, 32, generator=_gen()), torch.randn(2, 5, 32, generator=_gen(1))
    return (src, tgt), {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(5)}


class Recurrent(nn.Module):
    """A recurrent layer and a linear head on its last output."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def _sequence_inputs():
    return (torch.randn(2, 6, 8, generator=_gen()),), {}


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(24, 16, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )


def _image_inputs(size: int = 16):
    return (torch.randn(2, 3, size, size, generator=_gen()),), {}


# -- transformers ------------------------------------------------------------------------------

TINY = {"vocab_size": 64}
ENCODER = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
#: name -> (config class, model class, config) in transformers
HF = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, **TINY)),
    "bert": ("BertConfig", "BertModel", dict(hidden_size=32, **ENCODER, **TINY)),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(hidden_size=32, num_key_value_heads=2, **ENCODER, **TINY),
    ),
    "vit": ("ViTConfig", "ViTModel", dict(image_size=16, patch_size=4, hidden_size=32, **ENCODER)),
    "t5": (
        "T5Config",
        "T5Model",
        dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, **TINY),
    ),
}


def _hf(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        config, model, kwargs = HF[name]
        return getattr(transformers, model)(getattr(transformers, config)(**kwargs))

    return build


def _token_inputs():
    ids = torch.randint(0, 64, (2, 8), generator=_gen())
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return (), {"input_ids": ids, "attention_mask": mask}


def _t5_inputs():
    ids = torch.randint(0, 64, (2, 8), generator=_gen())
    return (), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


def _pixel_inputs():
    return (), {"pixel_values": torch.randn(2, 3, 16, 16, generator=_gen())}


# -- timm --------------------------------------------------------------------------------------


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        pytest.importorskip("timm")
        if name == "resnet":
            from timm.models.resnet import BasicBlock, ResNet

            return ResNet(
                BasicBlock, [1, 1, 1, 1], num_classes=10, stem_width=8, channels=(8, 16, 32, 64)
            )
        if name == "convnext":
            from timm.models.convnext import ConvNeXt

            return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=16,
            patch_size=4,
            embed_dim=32,
            depth=2,
            num_heads=4,
            mlp_ratio=2.0,
            num_classes=10,
        )

    return build


LINEAR = {"Linear"}
ATTENTION = {"MultiheadAttention", "NonDynamicallyQuantizableLinear", "Linear"}
CASES = {
    "torch-encoder": Case(_encoder, _encoder_inputs, ATTENTION, padded=PAD),
    "torch-decoder": Case(_decoder, _decoder_inputs, ATTENTION),
    "torch-transformer": Case(_transformer, _transformer_inputs, ATTENTION),
    "torch-lstm": Case(lambda: Recurrent(nn.LSTM), _sequence_inputs, LINEAR, {"LSTM"}),
    "torch-gru": Case(lambda: Recurrent(nn.GRU), _sequence_inputs, LINEAR, {"GRU"}),
    "torch-cnn": Case(_cnn, _image_inputs, {"Conv2d", "ConvTranspose2d"}),
    "hf-gpt2": Case(_hf("gpt2"), _token_inputs, {"Conv1D"}),
    "hf-bert": Case(_hf("bert"), _token_inputs, LINEAR),
    "hf-llama": Case(_hf("llama"), _token_inputs, LINEAR),
    "hf-vit": Case(_hf("vit"), _pixel_inputs, {"Conv2d", "Linear"}),
    "hf-t5": Case(_hf("t5"), _t5_inputs, LINEAR),
    "timm-resnet": Case(_timm("resnet"), _image_inputs, {"Conv2d", "Linear"}),
    "timm-vit": Case(_timm("vit"), _image_inputs, {"Conv2d", "Linear"}),
    "timm-convnext": Case(_timm("convnext"), lambda: _image_inputs(32), {"Conv2d", "Linear"}),
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(model: nn.Module, case: Case) -> torch.Tensor:
    args, kwargs = case.inputs()
    out = _output(model(*args, **kwargs))
    return out if case.padded is None else out.masked_fill(case.padded[..., None], 0.0)


def assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-30)
    assert float((got - ref).abs().max() / scale) <= rtol


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[nn.Module, nn.Module, FactorizeSummary]]:
    """Per architecture: (dense low-rank model, factorized model, summary), built on demand."""
    return {}


def _get(zoo, name: str):
    if name not in zoo:
        torch.manual_seed(0)
        dense = make_low_rank(CASES[name].build()).eval()
        small, summary = factorize(dense)
        zoo[name] = dense, small, summary
    return zoo[name]


@pytest.mark.parametrize("name", list(CASES))
def test_factorized_model_is_smaller_and_equal(zoo, name):
    case = CASES[name]
    dense, small, summary = _get(zoo, name)
    assert _params(small) < _params(dense)
    assert summary.model_params_after == _params(small)
    assert summary.model_params_before == _params(dense)
    done = {row.kind for row in summary.layers if row.factorized}
    assert case.kinds <= done, f"no factorized {case.kinds - done}"
    for row in summary.layers:
        assert row.factorized or row.reason
        if row.factorized:
            # GPT-2's c_attn is thresholded per q/k/v block but factorized whole: the ranks add
            stacked = 3 if row.name.endswith("c_attn.weight") else 1
            assert row.rank <= stacked * RANK and row.params_after < row.params_before
        if row.kind in case.dense_kinds:
            assert "recurrent layers stay dense" in row.reason and row.rank <= RANK
    with torch.no_grad():  # the inference fast paths (nested tensors, fused encoder layer)
        ref = _run(dense, case)
        assert_close(_run(small, case), ref)
    assert_close(_run(small, case).detach(), _run(dense, case).detach())  # autograd paths


@pytest.mark.parametrize("name", list(CASES))
def test_train_step_and_save_load(zoo, name):
    case = CASES[name]
    _, small, _ = _get(zoo, name)
    # save / load: the whole module, and architecture + state_dict
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    torch.manual_seed(1)
    rebuilt = load_factorized(case.build(), small.state_dict()).eval()
    with torch.no_grad():
        ref = _run(small, case)
        assert torch.equal(_run(whole, case), ref)
        assert torch.equal(_run(rebuilt, case), ref)
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in small.modules()]
    # one training step on the factors
    rebuilt.train()
    opt = torch.optim.SGD(rebuilt.parameters(), lr=1e-3)
    _run(rebuilt, case).float().square().mean().backward()
    factors = [p for m in rebuilt.modules() if isinstance(m, Factorized) for p in m.parameters()]
    grads = [p.grad for p in factors if p.grad is not None]  # (a pooler unused here has none)
    assert len(grads) > len(factors) // 2 and all(torch.isfinite(g).all() for g in grads)
    opt.step()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_torch_compile(zoo, name):
    """Dynamo + AOTAutograd (backend "aot_eager": no C++ toolchain needed): the compiled
    factorized model gives the eager outputs (eval mode, so deterministic) and backpropagates."""
    case = CASES[name]
    _, small, _ = _get(zoo, name)
    torch._dynamo.reset()
    compiled = torch.compile(small, backend="aot_eager")
    out = _run(compiled, case)
    assert_close(out.detach(), _run(small, case).detach(), 1e-6)
    out.float().square().mean().backward()
    assert any(p.grad is not None for p in small.parameters())
    small.zero_grad(set_to_none=True)


def test_summary_reports_blocks():
    """Attention is reported block by block with its own rank, recurrent weights gate by gate."""
    torch.manual_seed(0)
    model = make_low_rank(_encoder())
    with torch.no_grad():
        model.layers[0].self_attn.in_proj_weight[32:64] = 0  # W_k: rank 0, kept as rank 1
    small, summary = factorize(model)
    rows = {row.name: row for row in summary.layers}
    ranks = [rows[f"layers.0.self_attn.in_proj_weight[{b}]"].rank for b in "qkv"]
    assert ranks == [RANK, 1, RANK]
    assert small.layers[0].self_attn.k_proj.rank == 1
    assert rows["layers.0.self_attn.in_proj_weight[q]"].shape == (32, 32)
    lstm_rows = factorize(Recurrent(nn.LSTM))[1].layers
    gates = [r.name for r in lstm_rows if r.name.startswith("rnn.weight_hh_l1_reverse")]
    assert gates == [f"rnn.weight_hh_l1_reverse[{g}]" for g in "ifgo"]
    lstm_rows = [r for r in lstm_rows if r.kind == "LSTM"]
    assert len(lstm_rows) == 2 * 2 * 2 * 4  # layers x directions x (ih, hh) x gates
    assert {r.shape for r in lstm_rows} == {(16, 8), (16, 16), (16, 32)}
    for r in lstm_rows:
        assert not r.factorized and r.full_rank == min(r.shape) and r.rank == r.full_rank
        assert r.params_before == r.params_after == 16 * (r.shape[1] + 1)  # block + its bias


@pytest.mark.parametrize("name", list(CASES))
def test_default_selection_and_a_short_prox_run_lower_ranks(name):
    """The default selection reaches every weight matrix of the expected layer kinds, and a few
    ProxRank steps lower the rank of every selected matrix that has a gradient."""
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().train()
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=1e-2), model, lam=50.0)
    kinds = {t.module_type.__name__ for t in opt.targets}
    assert case.kinds | case.dense_kinds <= kinds
    owners = {  # every weight of those kinds is selected (a tied lm_head is left out)
        f"{mn}.{pn}" if mn else pn
        for mn, m in model.named_modules()
        if type(m).__name__ in case.kinds | case.dense_kinds
        for pn, p in m.named_parameters(recurse=False)
        if p.dim() >= 2 and "weight" in pn and min(p.shape[0], p[0].numel()) > 1
    }
    assert owners <= {t.param_name for t in opt.targets}
    full = {t.name: min(t.shape2d) for t in opt.targets}
    for _ in range(2):
        opt.zero_grad()
        _run(model, case).float().square().mean().backward()
        opt.step()
    stepped = [t for t in opt.targets if t.param.grad is not None]
    assert len(stepped) > len(opt.targets) // 2
    for t in stepped:
        rank = int(torch.linalg.matrix_rank(t.view.read(t.param.detach()).double(), rtol=1e-5))
        assert rank < full[t.name], t.name
