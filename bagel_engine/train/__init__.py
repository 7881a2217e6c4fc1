"""Fine-tuning BAGEL on packed multimodal data (text to image, editing, understanding, chat).

    from bagel_engine.train import TrainConfig, train
    checkpoint = train(TrainConfig(model="ByteDance-Seed/BAGEL-7B-MoT", data="pairs.jsonl", output_dir="runs/a"))
    pipe = bagel_engine.load(checkpoint)

``sample`` (what to learn), ``packing`` (samples into one sequence with the official mask),
``objective`` (the losses of one sequence), ``data`` (rows into packed sequences), ``trainer``
(the loop, data parallelism, EMA), ``checkpoint`` (model directories in the official layout).
"""

from bagel_engine.train.sample import Dropout, Picture, Sample, Text
from bagel_engine.train.trainer import TrainConfig, Trainer, train

__all__ = ["Dropout", "Picture", "Sample", "Text", "TrainConfig", "Trainer", "train"]
