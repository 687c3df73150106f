"""Is the agent getting better? Held-out evaluation runs (`heldout`) and the report's plots (`report`).

The pure statistics live in rewards/ (metrics, intervals); the SQL in store/ (eval_runs, report_data).
"""
