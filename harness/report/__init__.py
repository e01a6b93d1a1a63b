"""From stored results to reports: the tidy frame, pivot tables, Markdown/HTML pages and plots,
and the published numbers (`--reference paper`).
"""
