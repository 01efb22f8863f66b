"""The edit path in the controller: stream -> batch -> worker pool -> commit -> publish, with its verdicts, undo,
compaction, the retrieval indexer and the operator controls."""
