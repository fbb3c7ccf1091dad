"""UMT: pretraining of unified multimodal (image + text) transformers.

The library part (model, objectives, config, checkpoint, evaluation) imports nothing from
`data_pipeline` or `launch`.
"""

__version__ = "0.1.0"
