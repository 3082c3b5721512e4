"""What comes in: the data-registry import, freshness against the champion, the data diff."""
