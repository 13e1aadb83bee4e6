"""Experiments: pipelines that chain `instruct.train` stages through their workdirs."""
