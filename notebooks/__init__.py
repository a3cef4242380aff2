"""The notebooks (Colab, Kaggle) and the script that writes their links (`links.py`)."""
