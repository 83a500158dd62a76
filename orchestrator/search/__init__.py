"""The search: a space over student, distill and train keys, an Optuna study, trials as Ray Train runs."""
