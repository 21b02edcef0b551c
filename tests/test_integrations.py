"""Training frameworks accept ProxRank as their optimizer: PyTorch Lightning and the HF Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import proxrank

pl = pytest.importorskip("pytorch_lightning")
transformers = pytest.importorskip("transformers")


def _data(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = x @ torch.randn(16, 2, generator=g) @ torch.randn(2, 8, generator=g)
    return x, y


def _rank(W):
    return int(torch.linalg.matrix_rank(W.detach()))


class LitModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = proxrank.ProxRank(torch.optim.AdamW(self.parameters(), lr=1e-2), self, lam=2.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": sched}


@pytest.mark.slow
def test_lightning_trainer_fits_and_checkpoints(tmp_path):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    model = LitModel()
    trainer = pl.Trainer(
        max_epochs=15,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    (opt,) = trainer.optimizers
    assert isinstance(opt, proxrank.ProxRank) and opt.step_count == 60
    assert _rank(model.net[0].weight) < 16
    ckpt = torch.load(
        trainer.checkpoint_callback.best_model_path or next(tmp_path.rglob("*.ckpt")),
        weights_only=False,
    )
    assert ckpt["optimizer_states"][0]["proxrank"]["step_count"] == 60


class HFModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class DictData(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.mark.slow
def test_hf_trainer_trains_and_saves_optimizer_state(tmp_path):
    model = HFModel()
    opt = proxrank.ProxRank(torch.optim.AdamW(model.parameters(), lr=1e-2), model, lam=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=64,
        num_train_epochs=15,
        save_strategy="epoch",
        save_total_limit=1,
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=DictData(), optimizers=(opt, sched)
    )
    trainer.train()
    assert opt.step_count == 60
    assert _rank(model.net[0].weight) < 16
    saved = torch.load(next(tmp_path.rglob("optimizer.pt")), weights_only=False)
    assert saved["proxrank"]["step_count"] == 60


@pytest.mark.slow
def test_gpt2_trainer_example_runs(capsys):
    """The README's GPT-2 example (HF Trainer, default selection, factorize) in its quick mode."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "gpt2_trainer.py"
    spec = importlib.util.spec_from_file_location("gpt2_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.warns(UserWarning, match="lm_head.weight shares its tensor with an embedding"):
        result = module.main(["--quick"])
    table = capsys.readouterr().out
    for block in ("attn.c_attn.weight[q]", "attn.c_attn.weight[v]", "mlp.c_fc.weight"):
        assert f"transformer.h.0.{block}" in table
    assert math.isfinite(result["dense_loss"]) and math.isfinite(result["factorized_loss"])


@pytest.mark.slow
def test_gpt2_trainer_example_runs_the_size_recipe(capsys):
    """``--budget``: the README's size recipe through the HF Trainer; the weights end exactly at the
    budget's ranks, so factorizing them changes the held-out loss by rounding only."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "gpt2_trainer.py"
    spec = importlib.util.spec_from_file_location("gpt2_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.warns(UserWarning, match="lm_head.weight shares its tensor with an embedding"):
        result = module.main(["--quick", "--budget", "0.5"])
    assert result["factorized_loss"] == pytest.approx(result["dense_loss"], rel=1e-4)
    assert result["compression"] > 1.2
