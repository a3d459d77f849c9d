"""The Streamlit app (thin: the work is done by selfclassifier_core)."""
