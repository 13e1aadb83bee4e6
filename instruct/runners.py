"""Stage name (`config.stage`) -> the function that runs it, `fn(config, workdir)`.

An explicit table shared by the command line (`instruct.train`) and the experiment pipelines.
"""

from instruct import trainer
from instruct.rl import driver

RUNNERS = {**{stage: trainer.train_and_evaluate for stage in trainer.TASKS},
           "ppo": driver.train_ppo}
