"""Cross-site studies of fedabus: the study report (figures, table of numbers and findings)."""
