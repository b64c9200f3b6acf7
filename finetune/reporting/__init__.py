"""Reporting: what happened, for people: report.html (html), its figures (figures), the
augmentation preview (preview), and tables of many runs (runs).

Named ``reporting``, not ``report``: ``finetune.report`` is the function, and a subpackage
of that name would replace it on the package once imported.
"""
