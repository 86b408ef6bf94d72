"""Checkpoint rotation never leaves a folder that looks complete but is half deleted."""

from __future__ import annotations


def test_rotation_unmarks_before_deleting(tmp_path):
    """A rotated-away checkpoint loses its COMPLETE marker first, so a half-finished delete is never loaded."""
    from loraforge.train import checkpoint as ckpt

    for step in (1, 2, 3):
        d = tmp_path / f"step-{step}"
        (d / "adapter").mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        (d / ckpt.MARKER).write_text("ok\n")
    calls = []
    real_rmtree = ckpt.shutil.rmtree

    def spy(path, ignore_errors=False):
        calls.append((path.name, (path / ckpt.MARKER).exists()))
        real_rmtree(path, ignore_errors=ignore_errors)

    ckpt.shutil.rmtree = spy
    try:
        ckpt.rotate(tmp_path, keep_last=1, best_step=2)
    finally:
        ckpt.shutil.rmtree = real_rmtree
    assert calls == [("step-1", False)]  # the best (2) and the last (3) are kept
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-2", "step-3"]
