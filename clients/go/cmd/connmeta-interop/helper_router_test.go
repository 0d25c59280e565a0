package main

import (
	"go/ast"
	"go/parser"
	"go/token"
	"testing"
)

// The case router_helper_retargets proves that a router written with the
// helper takes under 30 lines: helperRouter is that router, so keep it so.
func TestHelperRouterIsUnder30Lines(t *testing.T) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "helpers13.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range f.Decls {
		if fn, ok := d.(*ast.FuncDecl); ok && fn.Name.Name == "helperRouter" {
			lines := fset.Position(fn.End()).Line - fset.Position(fn.Pos()).Line + 1
			if lines >= 30 {
				t.Fatalf("helperRouter takes %d lines, want under 30", lines)
			}
			t.Logf("helperRouter: %d lines", lines)
			return
		}
	}
	t.Fatal("no func helperRouter in helpers13.go")
}
