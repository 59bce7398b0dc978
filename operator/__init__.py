"""The MergeSearch controller: manifest schema, search spaces, the search loop, executors, the kopf edge."""
