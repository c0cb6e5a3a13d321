#!/usr/bin/env python3
"""Validates an OpenMetrics exposition (stdin) with PyPI's prometheus_client parser, which is
independent of Ferry's encoder, and prints its samples as JSON: [{"name", "labels", "value"}].
Exits non-zero with the parser's message if the exposition is malformed."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        samples.append({"name": sample.name, "labels": sample.labels, "value": sample.value})
json.dump(samples, sys.stdout)
