"""Reports: report.md, plots and tables, from metrics.json and the store."""
