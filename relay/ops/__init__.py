"""What operators and their tools see and do: the CLI, the doctor, status, metrics, logs, the
audit trail, exports and rescue mailboxes."""
