"""Checkpoint folders in storage: whole or absent, verified byte for byte before a resume."""

import tempfile
from pathlib import Path

import pytest

from shared import checkpoints, storage
from shared.checkpoints import CorruptCheckpoint


def source(tmp_path: Path, step: int) -> Path:
    folder = tmp_path / f"source-{step}"
    (folder / "nested").mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "nested" / "weights.bin").write_bytes(b"w" * 5000)
    return folder


class TestCheckpointStorage:
    def test_write_then_copy_out_verifies_every_file(self, settings, tmp_path):
        checkpoints.write("job_a", 7, source(tmp_path, 7), {"metrics": {"train_loss": 1.5}})
        assert storage.list_dir(storage.checkpoints_key("job_a")) == ["step-000000007"]
        restored = checkpoints.copy_out("job_a", 7, tmp_path / "restored")
        assert restored.step == 7 and restored.metrics == {"train_loss": 1.5}
        assert (tmp_path / "restored" / "nested" / "weights.bin").read_bytes() == b"w" * 5000

    def test_a_failed_write_leaves_nothing_and_the_previous_one_intact(self, settings, tmp_path):
        checkpoints.write("job_b", 1, source(tmp_path, 1), {})

        def crash() -> None:
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError):
            checkpoints.write("job_b", 2, source(tmp_path, 2), {}, before_commit=crash)
        assert storage.list_dir(storage.checkpoints_key("job_b")) == ["step-000000001"]
        assert checkpoints.verify("job_b", 1).step == 1

    def test_a_changed_byte_is_caught_before_resume(self, settings, tmp_path):
        checkpoints.write("job_c", 3, source(tmp_path, 3), {})
        file = storage.path(storage.checkpoint_key("job_c", 3)) / "optimizer.pt"
        data = bytearray(file.read_bytes())
        data[0] ^= 1
        file.write_bytes(bytes(data))
        assert [c.step for c in checkpoints.list_complete("job_c")] == [3]  # sizes still match
        with pytest.raises(CorruptCheckpoint):
            checkpoints.copy_out("job_c", 3, tmp_path / "restored")
        assert not (tmp_path / "restored").exists()

    def test_no_manifest_means_not_a_checkpoint(self, settings, tmp_path):
        checkpoints.write("job_d", 4, source(tmp_path, 4), {})
        (storage.path(storage.checkpoint_key("job_d", 4)) / checkpoints.MANIFEST).unlink()
        assert checkpoints.list_complete("job_d") == []

    def test_on_one_filesystem_the_files_are_moved_not_written_again(self, settings, tmp_path):
        folder = source(tmp_path, 5)
        inodes = {p.relative_to(folder).as_posix(): p.stat().st_ino for p in folder.rglob("*.*")}

        checkpoints.write("job_f", 5, folder, {})

        stored = storage.path(storage.checkpoint_key("job_f", 5))
        assert {name: (stored / name).stat().st_ino for name in inodes} == inodes
        assert not any(p.is_file() for p in folder.rglob("*"))
        assert checkpoints.verify("job_f", 5).step == 5  # the manifest's hashes hold

    def test_across_filesystems_the_files_are_copied(self, settings, tmp_path):
        with tempfile.TemporaryDirectory(dir="/dev/shm") as elsewhere:
            folder = source(Path(elsewhere), 6)

            checkpoints.write("job_g", 6, folder, {})

            stored = storage.path(storage.checkpoint_key("job_g", 6))
            assert folder.stat().st_dev != stored.stat().st_dev
            assert (folder / "nested" / "weights.bin").read_bytes() == b"w" * 5000
        assert checkpoints.verify("job_g", 6).step == 6
        restored = checkpoints.copy_out("job_g", 6, tmp_path / "restored")
        assert (tmp_path / "restored" / "optimizer.pt").read_bytes() == bytes(range(256)) * 40
        assert restored.step == 6

    def test_delete_all(self, settings, tmp_path):
        checkpoints.write("job_e", 1, source(tmp_path, 1), {})
        checkpoints.delete_all("job_e")
        assert storage.list_dir(storage.checkpoints_key("job_e")) == []
