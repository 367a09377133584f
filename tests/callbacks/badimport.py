raise ImportError("this module always fails to import (test fixture)")
