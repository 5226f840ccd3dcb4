"""The offline gold-reward task (`ssapo.bench.task`): a synthetic preference
task whose hidden reward plays the human, so annotation accuracy and win rates
are measurable on CPU."""
