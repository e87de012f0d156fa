"""What a run reports: metrics, plots, the HTML report and the model card."""
