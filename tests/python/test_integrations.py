"""torch_dopamine.integrations: transformers' Trainer and Lightning train
with Dopamine and no backward pass, on tiny randomly initialised models (no
weights from a hub)."""

import warnings

import pytest
import torch

import torch_dopamine


def _pattern_batches(vocab: int, length: int, count: int):
    """Token sequences that count up modulo `vocab` from a random start: a
    language a tiny model learns in a few steps."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, vocab, (count, 1), generator=generator)
    return (starts + torch.arange(length)) % vocab


def test_the_integrations_package_imports_no_framework():
    import sys

    import torch_dopamine.integrations  # noqa: F401

    assert "torch_dopamine.integrations.huggingface" not in sys.modules
    assert "torch_dopamine.integrations.lightning" not in sys.modules


class TestHuggingFace:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (scripts/setup.sh installs it)")

    def model_and_data(self):
        transformers = self.transformers
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=16, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
        tokens = _pattern_batches(16, 12, 64)
        data = [{"input_ids": row, "labels": row} for row in tokens]
        return model, data, tokens

    def arguments(self, tmp_path, **overrides):
        values = dict(
            output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=16, learning_rate=0.03,
            lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=10, use_cpu=True,
            disable_tqdm=True, seed=0,
        )
        values.update(overrides)
        return self.transformers.TrainingArguments(**values)

    def test_trainer_trains_a_gpt2_with_dopamine_and_no_backward(self, tmp_path):
        from torch_dopamine.integrations.huggingface import DopamineTrainer

        model, data, tokens = self.model_and_data()

        def loss_of_all():
            model.eval()
            with torch.no_grad():
                return model(input_ids=tokens, labels=tokens).loss.item()

        before = loss_of_all()
        trainer = DopamineTrainer(
            model=model, args=self.arguments(tmp_path), train_dataset=data, dopamine_options={"num_perturbations": 4}
        )
        trainer.train()
        assert isinstance(trainer.optimizer.optimizer, torch_dopamine.Dopamine)
        assert trainer.state.global_step == 40
        assert trainer.optimizer.optimizer.group_state(0)["step"] == 40
        assert all(p.grad is None for p in model.parameters())
        after = loss_of_all()
        assert after < before - 0.1, (before, after)
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(logged) == 4
        assert all(torch.isfinite(torch.tensor(logged)))

    def test_trainer_refuses_what_a_forward_only_step_cannot_do(self, tmp_path):
        from torch_dopamine.integrations.huggingface import DopamineTrainer

        model, data, _ = self.model_and_data()
        with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1, got 2"):
            DopamineTrainer(model=model, args=self.arguments(tmp_path, gradient_accumulation_steps=2), train_dataset=data)
        with pytest.raises(ValueError, match="lr is set through TrainingArguments.learning_rate"):
            DopamineTrainer(model=model, args=self.arguments(tmp_path), train_dataset=data, dopamine_options={"lr": 1.0})
        with pytest.raises(ValueError, match="pass its options as dopamine_options"):
            DopamineTrainer(
                model=model, args=self.arguments(tmp_path), train_dataset=data,
                optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
            )
        with pytest.warns(UserWarning, match="learning_rate is the Trainer's default"):
            DopamineTrainer(
                model=model, args=self.arguments(tmp_path, learning_rate=5e-5), train_dataset=data
            )

    def test_the_trainers_optimizer_refuses_a_stray_step_without_a_closure(self, tmp_path):
        from torch_dopamine.integrations.huggingface import DopamineTrainer

        model, data, _ = self.model_and_data()
        trainer = DopamineTrainer(model=model, args=self.arguments(tmp_path), train_dataset=data)
        optimizer = trainer.create_optimizer()
        with pytest.raises(RuntimeError, match="closure"):
            optimizer.step()


class TestLightning:
    lightning = pytest.importorskip("lightning", reason="lightning is not installed (scripts/setup.sh installs it)")

    def test_a_dopamine_module_trains_in_manual_optimisation(self):
        from torch_dopamine.integrations.lightning import DopamineModule

        torch.manual_seed(0)
        inputs = torch.randn(256, 8)
        targets = inputs @ torch.randn(8, 1)

        class Regression(DopamineModule):
            def __init__(self):
                super().__init__(lr=0.05, num_perturbations=4)
                self.net = torch.nn.Linear(8, 1)

            def loss(self, batch):
                x, y = batch
                return torch.nn.functional.mse_loss(self.net(x), y)

            def configure_optimizers(self):
                optimizer = super().configure_optimizers()
                return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 50, 0.5)}

        module = Regression()
        before = module.loss((inputs, targets)).item()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=64)
        trainer = self.lightning.Trainer(
            max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on data-loader workers
            trainer.fit(module, loader)
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, torch_dopamine.Dopamine)
        assert trainer.global_step == 150
        assert optimizer.group_state(0)["step"] == 150
        # The module stepped its scheduler: 0.05 halved at steps 50, 100 and 150.
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 8)
        assert all(p.grad is None for p in module.parameters())
        after = module.loss((inputs, targets)).item()
        assert after < before / 4, (before, after)
        assert "train_loss" in trainer.callback_metrics

    def test_a_module_without_a_loss_says_what_to_define(self):
        from torch_dopamine.integrations.lightning import DopamineModule

        with pytest.raises(NotImplementedError, match=r"define loss\(batch\)"):
            DopamineModule().loss(None)
