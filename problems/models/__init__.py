"""Models: ``BilevelProblem`` factories for one example, independent of configs and data.

``cifar`` (conv feedforward net and DEQ), ``inr`` (equilibrium INR) and ``mnist``
(eq. 11 equilibrium nets, haiku). The config -> Task builders that load data for
them are ``problems/{cifar,inr,mnist}.py``.
"""
