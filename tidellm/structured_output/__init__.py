"""Structured outputs (constrained decoding): JSON schemas, regexes, EBNF grammars and choices.

``spec`` turns a request's ``StructuredOutputsParams`` into a cache key; ``backend`` is the interface a
grammar library implements (``xgrammar_backend`` today); ``validate`` refuses bad constraints in the front
end before anything is queued; ``manager`` compiles grammars off the step in the engine core and keeps one
matcher per request. The scheduler asks the manager for each step's bitmask, and the sampler applies it to
the logits (``tidellm.sample.bitmask``).
"""
