"""The comparison report: runs, tables, figures and their Markdown/HTML rendering."""
