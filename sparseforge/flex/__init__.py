"""FlexAttention users' front end: mask_mod / score_mod read into closed-form patterns
(``trace`` -> ``lower`` / ``scores``), and Flex's own calls (``api``)."""
