"""The embedded toy target: a small Llama trained here on the Python standard library's sources
(``corpus``, ``tokenizer``, ``target``), and the LK-trained drafter `make serve` builds for it
(``default_drafter``). Nothing here is needed to train a drafter for a target of your own."""
