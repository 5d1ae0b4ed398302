"""One module per kind of task, each holding what differs in code between tasks: checking rows, turning
them into features, scoring a model. The table that says what each task is: llmkit.tasks."""
