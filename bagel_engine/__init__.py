"""bagel-engine: a fast, faithful engine for ByteDance's BAGEL-7B-MoT.

    import bagel_engine
    pipe = bagel_engine.load("ByteDance-Seed/BAGEL-7B-MoT")
    pipe.generate("a red fox in the snow").image.save("fox.png")
"""

from bagel_engine.api import BagelOutput, BagelPipeline, load
from bagel_engine.inspection import inspect_model
from bagel_engine.params import BagelInputError, ImageParams, TextParams

__all__ = ["load", "inspect_model", "BagelPipeline", "BagelOutput", "BagelInputError", "ImageParams", "TextParams"]
__version__ = "0.1.0"
