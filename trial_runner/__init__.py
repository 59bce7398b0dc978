"""What runs inside one trial: fetch weights, merge a plan, evaluate a range of samples, report.

Never imports the operator (an import-linter contract holds this).
"""
