"""One module per CLI verb: EXAMPLE, add_arguments(parser) and run(args), nothing else.

A verb imports the heavy libraries (torch, transformers, datasets) inside run() and the
functions it calls, never at module level: `llmtrain VERB --help` builds the verb's parser
by importing its module, and must answer in well under a second on a login node.
tests/unit/test_layout.py checks that importing a verb module imports none of them."""
