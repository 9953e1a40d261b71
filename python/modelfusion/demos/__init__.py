"""The built-in examples behind ``modelfusion demo``: ``streaming`` (the pipeline on generated
Llama-shaped and real MiniLM families), ``weight_average`` (digit experts merged and ensembled)
and ``alignment`` (two digit MLPs aligned, the loss barriers between them). No downloads."""
