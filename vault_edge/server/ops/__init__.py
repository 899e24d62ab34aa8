"""Operations of the control plane: each one a transaction, each change audited, each wake announced."""
