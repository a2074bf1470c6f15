"""megaflamingo."""
