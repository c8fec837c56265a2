"""The Lightning callbacks, in a tiny Trainer run on the CPU, against the plain objects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from sgdgeom import DiffusionMatrix, DiffusionMetricSGD, LayerTemperature  # noqa: E402
from sgdgeom.data import load_dataset  # noqa: E402
from sgdgeom.integrations.lightning import DiffusionSpectrum, LayerTemperatures  # noqa: E402
from sgdgeom.models import build_model  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return DiffusionMetricSGD(self.net, lr=0.05, fused="off")


class Recorder(pl.Callback):
    """An independent LayerTemperature fed the same gradients, in the same hook."""

    def __init__(self, net: nn.Module) -> None:
        self.plain = LayerTemperature(model=net)
        self.epochs: list[dict[str, float]] = []

    def on_after_backward(self, trainer, pl_module):
        self.plain.record()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(self.plain.epoch_metrics(trainer.current_epoch + 1))


def test_callbacks_log_what_the_plain_objects_measure(tmp_path):
    ds = load_dataset("digits").subset(128, 32)
    x, y = ds.normalize(ds.x_train), ds.y_train
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    net = build_model("mlp", ds.input_shape, 10, widths=[16])
    probe = (x[:40], y[:40])
    temperatures = LayerTemperatures(module="net")
    spectrum = DiffusionSpectrum(probe, every=2, module="net")
    recorder = Recorder(net)
    trainer = pl.Trainer(
        max_epochs=4, accelerator="cpu", callbacks=[temperatures, spectrum, recorder],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Classifier(net), loader)

    assert [h["epoch"] for h in temperatures.history] == [1, 2, 3, 4]
    for logged, plain in zip(temperatures.history, recorder.epochs, strict=True):
        assert {k: v for k, v in logged.items() if k != "epoch"} == plain
    assert set(recorder.epochs[-1]) == {f"temperature/{n}/{s}" for n in ("fc1", "out")
                                        for s in ("signal", "noise")}  # fmt: skip
    assert [h["epoch"] for h in spectrum.history] == [2, 4]
    D = DiffusionMatrix(net.eval(), "cross_entropy", probe)
    last = spectrum.history[-1]
    assert last["spectrum/lambda_max"] == pytest.approx(float(D.eigvalsh()[0]), rel=1e-6)
    assert last["spectrum/trace"] == pytest.approx(D.trace(), rel=1e-6)
    assert torch.allclose(torch.tensor(last["eigenvalues"]), D.eigvalsh().float(), atol=1e-6)
    assert trainer.callback_metrics["spectrum/lambda_max"] == pytest.approx(
        last["spectrum/lambda_max"]
    )
    assert "temperature/fc1/signal" in trainer.callback_metrics
