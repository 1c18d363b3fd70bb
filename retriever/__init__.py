"""The specdraft retriever: drafting service over the C++ suffix-index core (`retriever._core`)."""
