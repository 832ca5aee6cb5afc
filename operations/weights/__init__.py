"""Model weights: volumes staged from the control node or a bundle (``volumes``), fetched from a
Hugging Face hub (``hub``), and backed up to and restored from the control node (``backup``)."""
