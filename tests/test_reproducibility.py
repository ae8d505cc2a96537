"""Seeded runs replay exactly: each epoch's data order and augmentations depend only on (SEED, epoch), also with
loader workers, which is what makes a resumed run end where an uninterrupted one does."""

from __future__ import annotations

import torch


def _first_batch(trainer, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    trainer.epoch = epoch
    trainer.before_epoch()
    batch = next(iter(trainer.train_loader_x))
    return batch["img"], batch["index"]


def test_epoch_batches_depend_only_on_seed_and_epoch_with_workers(make_trainer):
    trainer = make_trainer("CoOp", **{"DATASET.NUM_SHOTS": 4, "SEED": 3, "DATALOADER.NUM_WORKERS": 2,
                                      "DATALOADER.TRAIN_X.BATCH_SIZE": 8,
                                      "INPUT.TRANSFORMS": "('random_resized_crop', 'random_flip', 'normalize')"})
    img_a, idx_a = _first_batch(trainer, 2)
    for epoch in (0, 1):  # consume other epochs in between, as an uninterrupted run would
        trainer.epoch = epoch
        trainer.before_epoch()
        for _ in trainer.train_loader_x:
            pass
    img_b, idx_b = _first_batch(trainer, 2)
    assert torch.equal(idx_a, idx_b) and torch.equal(img_a, img_b)
    img_c, idx_c = _first_batch(trainer, 3)
    assert not torch.equal(img_a, img_c)  # another epoch, other order and crops
