"""The documented rule for "auto" hyperparameters."""

from shared.schemas import Hyperparameters
from worker.auto_hyperparameters import (
    auto_batch_size,
    auto_epochs,
    auto_learning_rate,
    resolve,
)


class TestRule:
    def test_batch_size_aims_at_16k_tokens_per_step(self):
        assert auto_batch_size(block_size=512, train_blocks=10_000) == 32
        assert auto_batch_size(block_size=1024, train_blocks=10_000) == 16
        assert auto_batch_size(block_size=100, train_blocks=10_000) == 64  # capped
        assert auto_batch_size(block_size=32768, train_blocks=10_000) == 1
        assert auto_batch_size(block_size=512, train_blocks=3) == 3  # never more than the data

    def test_epochs_aim_at_2m_tokens_seen(self):
        assert auto_epochs(train_tokens=1_000) == 10.0
        assert auto_epochs(train_tokens=500_000) == 4.0
        assert auto_epochs(train_tokens=50_000_000) == 1.0

    def test_learning_rate_scales_with_model_size_and_method(self):
        assert auto_learning_rate(124_000_000, "full") == 5e-5
        assert auto_learning_rate(7_000_000_000, "full") == 6.65e-6
        assert auto_learning_rate(70_000_000_000, "full") == 5e-6  # floor
        assert auto_learning_rate(124_000_000, "lora") == 5e-4
        assert auto_learning_rate(200_000, "full") == 1e-3  # ceiling


class TestResolve:
    def test_only_auto_fields_change(self):
        given = Hyperparameters(epochs="auto", batch_size=4, learning_rate="auto", block_size=64)
        resolved = resolve(
            given, train_tokens=6_400, train_blocks=100, parameters=124_000_000, method="full"
        )
        assert resolved.epochs == 10.0 and resolved.learning_rate == 5e-5
        assert resolved.batch_size == 4 and resolved.block_size == 64
        assert "auto" not in resolved.model_dump().values()
