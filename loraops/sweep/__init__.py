"""The rank sweep (r=4→8→16): trial plan, stop rule and winner; each trial a child MLflow run through the stages."""
